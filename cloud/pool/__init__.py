"""The public pool: loading images, encoding them, clustering the features, the pool index.

dataset (folders of images) -> features (the encoder over the pool, cached) -> clustering (spherical
k-means) -> index (features, clusters, radii; makes the probe a device scores).
"""
