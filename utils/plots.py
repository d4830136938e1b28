"""`python -m utils.plots`, the documented command. Its code lives in the analysis
layer (utils/analysis/plots.py); this entry point only runs it there, so the command
stays the same."""
import runpy

if __name__ == "__main__":
    runpy.run_module("utils.analysis.plots", run_name="__main__", alter_sys=True)
