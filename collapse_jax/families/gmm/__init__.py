"""The Gaussian-mixture family: recursive EM fits."""
