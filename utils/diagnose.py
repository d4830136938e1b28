"""`python -m utils.diagnose`, the documented command. Its code lives in the analysis layer
(utils/analysis/diagnose.py); this entry point only runs it there."""
import runpy

if __name__ == "__main__":
    runpy.run_module("utils.analysis.diagnose", run_name="__main__", alter_sys=True)
