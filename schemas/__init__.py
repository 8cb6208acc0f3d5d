"""pyarrow schemas: raw clickstream events, dead letters and released tables."""
