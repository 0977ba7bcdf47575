"""The 2-D toy of the paper's Fig. 3: a Gaussian mixture with an exact denoiser, and its report."""
