"""Images on storage: the dataset format (Parquet shards of encoded images and their
manifests), its writer, the ingests that make a dataset, the rows training streams, the
read-ahead threads, the storage layer (local, S3, any fsspec URL) and garbage collection.
Knows nothing of models, training or evaluation."""
