"""Model families: each folder holds its kernel or model, metrics, closed forms and study."""
