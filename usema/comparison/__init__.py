"""``usema compare``: paired, per-case comparison of two methods (Wilcoxon signed-rank, bootstrap CI), with the
seed-to-seed spread of each when several runs per method are given. Modules: scores (reading per-case scores),
stats (the tests), report (Markdown / JSON), command (the CLI)."""
