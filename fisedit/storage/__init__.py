"""Object storage (S3 and local directory); knows neither Ray nor torch."""
