"""optimum-edkm's commands for ``optimum-cli`` (read by optimum's ``load_optimum_namespace_cli_commands``).

    optimum-cli edkm compress --model MODEL --bits 3 --output OUT
    optimum-cli edkm evaluate OUT [OTHER ...]
    optimum-cli export coreml-edkm SAVED_DIR OUT.mlpackage

optimum imports this module on every ``optimum-cli`` start, so it stays light: the argument definitions are
loaded from ``optimum_edkm/commands/arguments.py`` by location (plain argparse; importing the package itself
would load torch and transformers), and torch, transformers and optimum_edkm are imported only in ``run()``.
This folder must not get an ``__init__.py`` (``optimum.commands.register`` is a PEP 420 namespace).
"""

import importlib.util
import os
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand

_ARGUMENTS_MODULE = "_optimum_edkm_cli_arguments"


def _arguments():
    """``optimum_edkm.commands.arguments`` without running ``optimum_edkm/__init__.py``."""
    if _ARGUMENTS_MODULE in sys.modules:
        return sys.modules[_ARGUMENTS_MODULE]
    spec = importlib.util.find_spec("optimum_edkm")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next(
        (
            os.path.join(folder, "commands", "arguments.py")
            for folder in locations
            if os.path.isfile(os.path.join(folder, "commands", "arguments.py"))
        ),
        None,
    )
    if path is None:  # not a plain folder (zip, frozen): import it
        from optimum_edkm.commands import arguments

        return arguments
    module_spec = importlib.util.spec_from_file_location(_ARGUMENTS_MODULE, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[_ARGUMENTS_MODULE] = module
    module_spec.loader.exec_module(module)
    return module


class EDKMCompressCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="compress", help="the main job: post-training start, clustering-aware training, palettize, save, report"
    )

    @staticmethod
    def parse_args(parser):
        _arguments().add_compress_arguments(parser)

    def run(self):
        from optimum_edkm.commands.cli import run_command

        status = run_command("compress", self.args)
        if status:
            raise SystemExit(status)


class EDKMEvaluateCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="evaluate", help="perplexity and size of saved models on the same held-out text")

    @staticmethod
    def parse_args(parser):
        _arguments().add_evaluate_arguments(parser)

    def run(self):
        from optimum_edkm.commands.cli import run_command

        status = run_command("evaluate", self.args)
        if status:
            raise SystemExit(status)


class EDKMCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="edkm", help="eDKM palettization (optimum-edkm): compress, evaluate")
    SUBCOMMANDS = (
        CommandInfo(
            name=EDKMCompressCommand.COMMAND.name,
            help=EDKMCompressCommand.COMMAND.help,
            subcommand_class=EDKMCompressCommand,
        ),
        CommandInfo(
            name=EDKMEvaluateCommand.COMMAND.name,
            help=EDKMEvaluateCommand.COMMAND.help,
            subcommand_class=EDKMEvaluateCommand,
        ),
    )


class CoreMLEDKMExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="coreml-edkm", help="Export a palettized optimum-edkm model to Core ML (LUT ops)")

    @staticmethod
    def parse_args(parser):
        _arguments().add_coreml_export_arguments(parser)

    def run(self):
        from optimum_edkm.commands.cli import run_coreml

        status = run_coreml(self.args)
        if status:
            raise SystemExit(status)


REGISTER_COMMANDS = [EDKMCommand, (CoreMLEDKMExportCommand, ExportCommand)]
