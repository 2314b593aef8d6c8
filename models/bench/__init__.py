"""One benchmark command for the whole system: `python -m models.bench` (see `--help` and README "Benchmarks").

Every comparison runs its two sides in separate processes that stay up for the row, alternating one request (or
one block of requests) at a time, repeated, so that load from elsewhere on the machine falls on both sides alike.
Results go to a Markdown table and a JSON file (median, p95, ratio).

Modules: `stats` (samples, alternation), `processes` (the server over HTTP and a bare diffusers process),
`bare` (that bare process), `rows` (the comparisons), `training_rows`, `report`.
"""
