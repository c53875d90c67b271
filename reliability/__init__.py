"""Reliability runs: replica faults under load, overload, soak, hostile input.

`make reliability` runs them all (`reliability.run`) and writes `reports/reliability.{json,md}`.
The fast parts (hostile-input matrix, broken artifacts, auth, a retry drill) live in
`tests/deployments/` and run with `make test`.
"""
