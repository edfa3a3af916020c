"""Linear regression refitted generation after generation on its own labels."""
