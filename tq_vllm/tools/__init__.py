"""The command-line tools: `tq-vllm` (cli.py), the quality eval (eval/), outlier-channel
calibration (calibrate.py), the serving benchmark (bench_serving.py), the server harness
(server.py) and the embedded model (model.py)."""
