"""`python -m utils.report`, the documented command. Its code lives in the analysis
layer (utils/analysis/report.py); this entry point only runs it there, so the command
stays the same."""
import runpy

if __name__ == "__main__":
    runpy.run_module("utils.analysis.report", run_name="__main__", alter_sys=True)
