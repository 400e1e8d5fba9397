"""Out-of-core training: parameters and optimizer state live on disk in chunks.

``chunks`` (the protocol a model implements), ``store`` (chunk files, manifest commit),
``cache`` (resident chunks, prefetch, write-behind), ``budget`` (memory budget and its check),
``memory`` (resident-set measurement), ``executor`` (the streamed step), ``export`` (a
committed state as a state dict).
"""
