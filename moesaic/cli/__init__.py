"""The `moesaic` command line: the one place that parses arguments.

`main.py` is the entry point; it holds the table of commands and imports a command's module
only when that command runs. One module per command group, named after what a user types
(`data`, `train` for train / pretrain / branch, `merge` for merge and its actions and
tune-router, `eval`, `hf` for import-hf / export-hf, `launch`, `plan`, `demo`); the
arguments they share are in `args.py`. A command module parses, calls a library function,
prints and maps its errors to exit codes; the work itself is in the library packages, none
of which imports this one.
"""
