"""What lives on disk: dataset manifests, the HDF5 feature store, checkpoints and run logs."""
