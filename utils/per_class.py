"""`python -m utils.per_class`, the documented command. Its code lives in the analysis
layer (utils/analysis/per_class.py); this entry point only runs it there, so the command
stays the same."""
import runpy

if __name__ == "__main__":
    runpy.run_module("utils.analysis.per_class", run_name="__main__", alter_sys=True)
