"""The shell: the ``moeplan`` CLI (typer), its inputs and outputs. Commands stay thin and never import
each other; what they share lives in modules of its own.

May import: every room of moeplan.
"""
