"""The CUDA decode megakernel backend: build (nvcc at first use), backend (MegakernelBackend), validate, bench."""
