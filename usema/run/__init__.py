"""The run format: run-directory layout, checkpoints and the network spec they carry."""
