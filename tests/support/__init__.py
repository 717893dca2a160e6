"""What the tests share, imported one way (`from tests.support.training import make_data`):
  processes   the repository root, subprocesses with N fake CPU devices, their JSON output
  training    a tiny config, a tiny prepared data folder, the `moesaic` command as a subprocess
  merging     synthetic bases and branches written as checkpoints, and comparing checkpoints
  evaluation  tiny decoders for the evaluation tests
Fixtures are in tests/conftest.py."""
