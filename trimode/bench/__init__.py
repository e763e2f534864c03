"""The measurement harness: suites, runners, the HF baseline, and the report (table, JSON, plots)."""
