"""The main job: particles in, poses and maps out, as one library call (``run(JobConfig) -> Report``).

driver.py sequences the stages; config.py holds the settings and options.py their declaration; poses.py
(feed-forward, selection, refinement), classes.py (several classes), judge.py (the verdict), maps.py
(reconstruction) and outputs.py (the files) do the work; resume.py makes a rerun resume or do nothing;
report.py is what a run says it did; step_file.py reads a YAML step file into a JobConfig."""
from cryofastar_core.job.config import JOB_OPTIONS, JobConfig
from cryofastar_core.job.driver import run
from cryofastar_core.job.report import Report

__all__ = ["JOB_OPTIONS", "JobConfig", "Report", "run"]
