"""``usema plan``: dataset fingerprint and nnU-Net-style automatic planning of a training recipe.

Modules: fingerprint (what the dataset holds), memory (training memory of a network at a patch and batch),
planner (target spacing, patch, stages, batch, normalisation from a fingerprint), recipe_text (the commented
recipe), command (the CLI).
"""
