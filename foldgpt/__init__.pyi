"""What ``foldgpt/__init__.py`` exports lazily, for type checkers and editors (the module imports them on first use)."""

from foldgpt._version import __version__ as __version__
from foldgpt.analysis.redundancy import RedundancyStats as RedundancyStats
from foldgpt.analysis.redundancy import redundancy_stats as redundancy_stats
from foldgpt.data.config import CalibrationConfig as CalibrationConfig
from foldgpt.errors import FoldGPTError as FoldGPTError
from foldgpt.eval.efficiency import EfficiencyReport as EfficiencyReport
from foldgpt.eval.efficiency import measure_efficiency as measure_efficiency
from foldgpt.eval.lm_tasks import TaskResults as TaskResults
from foldgpt.eval.lm_tasks import evaluate_tasks as evaluate_tasks
from foldgpt.eval.perplexity import PerplexityResult as PerplexityResult
from foldgpt.eval.perplexity import perplexity as perplexity
from foldgpt.formats.loading import LoadedModel as LoadedModel
from foldgpt.formats.loading import load_model as load_model
from foldgpt.formats.plain import export_plain as export_plain
from foldgpt.healing.config import HealConfig as HealConfig
from foldgpt.healing.loop import HealResult as HealResult
from foldgpt.healing.loop import heal as heal
from foldgpt.selection.config import PRUNE_SCREEN as PRUNE_SCREEN
from foldgpt.selection.config import GateConfig as GateConfig
from foldgpt.selection.config import ProbeConfig as ProbeConfig
from foldgpt.surgery.config import ReplacementConfig as ReplacementConfig
from foldgpt.surgery.config import TieConfig as TieConfig
from foldgpt.surgery.removal import remove_blocks as remove_blocks
from foldgpt.workflows.analyze import analyze as analyze
from foldgpt.workflows.compress import compress as compress
from foldgpt.workflows.config import CompressConfig as CompressConfig
from foldgpt.workflows.fold import FoldResult as FoldResult
from foldgpt.workflows.fold import fold_model as fold_model
from foldgpt.workflows.fold import tie_model as tie_model
from foldgpt.workflows.fold_plan import fold_auto as fold_auto
from foldgpt.workflows.prune import PruneResult as PruneResult
from foldgpt.workflows.prune import prune as prune

load = load_model
