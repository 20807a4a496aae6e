"""Command line: ``optimum-edkm compress | evaluate | export`` and, with optimum installed, the same as
``optimum-cli edkm compress | evaluate`` and ``optimum-cli export coreml-edkm``.

The ``optimum-cli`` commands are registered by ``optimum/commands/register/register_edkm.py`` (optimum's
command-registration namespace); both front ends share :mod:`optimum_edkm.commands.arguments` and run the same
functions (:func:`optimum_edkm.commands.compress.compress`, :func:`optimum_edkm.commands.evaluate.evaluate_models`).
"""

from .cli import main, run_command

__all__ = ["main", "run_command"]
