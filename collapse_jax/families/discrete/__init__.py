"""The discrete family: a K-state distribution refitted from M samples (Wright–Fisher)."""
