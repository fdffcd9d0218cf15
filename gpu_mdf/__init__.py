"""gpu-mdf: train Keras models on MNIST, convert them to ModECI MDF, and run MDF
graphs for bulk inference on CuPy (GPU) or NumPy (CPU)."""

__version__ = "0.1.0"
