"""Reliability runs: replica faults under load, the stream events channel cut and flooded,
overload, soak, hostile input, a crashed `serve run` restarted.

`make reliability` runs them all (`reliability.run`) and writes `reports/reliability.{json,md}`.
The fast parts (hostile-input matrix, broken artifacts, auth, a retry drill) live in
`tests/deployments/` and run with `make test`.
"""
