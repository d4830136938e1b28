"""`python -m utils.sweep_tools`, the documented command. Its code lives in the analysis
layer (utils/analysis/sweep_tools.py); this entry point only runs it there, so the command
stays the same."""
import runpy

if __name__ == "__main__":
    runpy.run_module("utils.analysis.sweep_tools", run_name="__main__", alter_sys=True)
