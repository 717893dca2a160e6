"""`moesaic demo`'s pipeline: the whole flow on the embedded corpora, with a report a person
reads. Its settings are a config file (moesaic/configs/demo.py); the command is
moesaic/cli/demo.py.

  pipeline  the stages as a list of records (name, output, function) built from the settings
  runner    walks the stages, skipping those whose output exists (a re-run resumes)
  systems   the names of the systems the report compares
  findings  the plain sentences on what the numbers show
  workdir   a workdir's claim on its settings (W/preset.json), its compilation cache
"""
