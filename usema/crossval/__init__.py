"""`usema cv`: 5-fold cross-validation, its evaluation and the post-processing chosen on it."""
