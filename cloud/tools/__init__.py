"""Demo and benchmark tooling, not the production path: the end-to-end demo, a local broker,
the offline pipeline helpers and the dataset generators (datagen).
"""
