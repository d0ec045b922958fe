"""Datasets (demo brain / nuclei, nnU-Net raw), normalisation and training patch pipelines.

``prepare_data(recipe, work_dir) -> PreparedData`` is the interface the trainer uses.
"""

from usema.data.prepare import PreparedData, prepare_data, split_cases

__all__ = ["PreparedData", "prepare_data", "split_cases"]
