"""Stand-ins for psbody-mesh (benchmarks/now_official/run_official.py)."""
