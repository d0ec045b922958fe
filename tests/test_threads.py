"""Thread counts follow the CPUs a process may use (affinity, cgroup quota), not the host's core count."""

from __future__ import annotations

import os

import pytest
import torch

from usema.errors import UsemaError
from usema.threads import cgroup_cpu_limit, configure_threads, usable_cpus


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
        ({"cpu.max": "garbage"}, None),
    ],
    ids=["v2-unlimited", "v2-1.5", "v1-0.5", "v1-unlimited", "none", "unreadable"],
)
def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


def test_usable_cpus_is_the_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert usable_cpus(tmp_path) == 8  # no quota files
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert usable_cpus(tmp_path) == 3  # 2.5 CPUs of quota: 3 threads, never more than the affinity
    (tmp_path / "cpu.max").write_text("20000 100000\n")
    assert usable_cpus(tmp_path) == 1


def test_configure_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr("usema.threads.usable_cpus", lambda: 2)
        assert configure_threads(None) == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr("usema.threads.usable_cpus", lambda: 8)
        # torchrun with 3 CPU processes on this machine: each gets its share, never 0
        assert configure_threads(None, processes=3) == 2
        assert configure_threads(None, processes=16) == 1
    finally:
        torch.set_num_threads(before)


class _ThreadCount(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return torch.get_num_threads()


def test_training_data_workers_run_one_thread_each():
    """Workers that inherited the trainer's thread count would fight it for the same cores."""
    from usema.training.rng import seed_worker

    loader = torch.utils.data.DataLoader(_ThreadCount(), batch_size=None, num_workers=2, worker_init_fn=seed_worker)
    assert list(loader) == [1, 1]


@pytest.mark.parametrize("command", ["train", "infer", "cv"])
def test_commands_that_run_networks_take_threads(command):
    from usema.cli import build_parser

    argv = {"train": ["train", "demo_brain"], "infer": ["infer", "m", "-i", "x", "-o", "y"], "cv": ["cv", "r", "-o", "d"]}
    args = build_parser(command).parse_args([*argv[command], "--threads", "3"])
    assert args.threads == 3
    with pytest.raises(UsemaError, match="--threads.*expected a positive integer, got 0"):
        build_parser(command).parse_args([*argv[command], "--threads", "0"])


def test_openmp_threads_wait_passively_unless_the_user_chose():
    from usema.threads import prefer_passive_waits

    env: dict[str, str] = {}
    prefer_passive_waits(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(chosen)
        prefer_passive_waits(env)
        assert env == chosen


def test_the_command_line_sets_the_wait_policy_before_torch_loads(tmp_path):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: the CLI must set it before any torch import."""
    import subprocess
    import sys

    probe = ("import os, sys; from usema import cli; "
             "cli.COMMANDS['probe'] = ('probe_cmd', 'probe'); sys.argv = ['usema', 'probe']; cli.main()")
    (tmp_path / "probe_cmd.py").write_text(
        "import os, sys\n"
        "def add_parser(sub):\n"
        "    p = sub.add_parser('probe', help='probe'); p.set_defaults(func=run)\n"
        "def run(args):\n"
        "    print('torch-before', 'torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n"
        "    return 0\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert "torch-before False PASSIVE" in out
