"""Everything between image folders on disk and batches on the training device.

layout (folder layouts) -> imagefiles (scan, decode) -> dataset (checked splits,
splits' holdout and leak check) -> views (stored views, the framing) ->
loaders / pipeline (batches) -> stats (normalisation) -> augment (on the device).
"""
