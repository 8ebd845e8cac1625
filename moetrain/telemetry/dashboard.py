"""moetrain-dashboard: a Weights & Biases workspace for routing balance, laid out from the keys moetrain logs.

    moetrain-dashboard --project P [--entity E] [--name NAME] [--run-dir RUN] [--offline-out FILE] [OVERRIDE ...]

Sections and panels (x axis: the training step `step`; metric keys in docs/metrics.md):

    Routing balance     batch MaxVio of every MoE layer; window MaxVio of every MoE layer;
                        per MoE layer L: its batch and window MaxVio together
    Expert load         the layer x expert load heatmap images (`moe/load_heatmap`, one per logger.heatmap_every
                        steps, browsed by step); per MoE layer L: tokens per expert over steps (a histogram per
                        logged step, which wandb draws as an expert x step heatmap)
    Router bias         bias min, max and std of every MoE layer (aux-loss-free balancing)
    Ranks and capacity  busiest rank's load / mean rank load, dropped fraction (capacity mode only), pipeline degree
    Training            loss and val_loss, aux_loss, lr, tokens_per_s

Panels over every layer select their keys with a regular expression (`^moe/layer[0-9]+/max_vio$`), so they fit any
model. The per-layer panels need the MoE layer ids, taken from RUN/config.yaml with --run-dir, else from the
config the OVERRIDEs compose (the same `model=... model.n_layers=...` as the training command; none: the default
model).

Online (the default) the workspace is saved to the project (wandb's own login; `--entity` defaults to the API key's
default entity) and its URL printed. With --offline-out FILE nothing goes over the network: the workspace
definition, the view that wandb-workspaces would upload, is written to FILE as JSON (`spec.section.panelBankConfig
.sections[].panels[].config` holds each panel's `metrics`, `metricRegex` or `mediaKeys`).

Needs the wandb-workspaces package: pip install 'moetrain[dashboard]'.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["PanelSpec", "dashboard_sections", "moe_layer_ids", "build_workspace", "workspace_definition", "main"]

PROG = "moetrain-dashboard"
WORKSPACES_MISSING = "moetrain-dashboard needs the wandb-workspaces package: pip install 'moetrain[dashboard]'"
X_AXIS = "step"  # the logged training step (WandbLogger declares it the x axis of every metric)


class DashboardError(ValueError):
    """A problem the user can fix (bad arguments, a missing package or run directory); one line."""


@dataclass(frozen=True)
class PanelSpec:
    """One panel: a line plot of `keys` or of every metric matching `regex`, or a media browser of `keys`."""

    title: str
    keys: tuple[str, ...] = ()
    regex: Optional[str] = None
    kind: str = "line"  # line | media


def _every_layer(stat: str) -> str:
    return rf"^moe/layer[0-9]+/{stat}$"


def dashboard_sections(moe_layers: Sequence[int]) -> list[tuple[str, list[PanelSpec]]]:
    """The workspace's sections in order, each a (name, panels) pair; per-layer panels for `moe_layers`."""
    balance = [
        PanelSpec("MaxVio per step, every MoE layer", regex=_every_layer("max_vio")),
        PanelSpec("MaxVio over the logging window, every MoE layer", regex=_every_layer("max_vio_global")),
    ] + [
        PanelSpec(f"layer {L} MaxVio: step and window", keys=(f"moe/layer{L}/max_vio", f"moe/layer{L}/max_vio_global"))
        for L in moe_layers
    ]
    load = [PanelSpec("expert load / mean load, layer x expert", keys=("moe/load_heatmap",), kind="media")] + [
        PanelSpec(f"layer {L} tokens per expert over steps", keys=(f"moe/layer{L}/tokens_per_expert",))
        for L in moe_layers
    ]
    bias = [PanelSpec(f"router bias {stat[5:]}, every MoE layer", regex=_every_layer(stat))
            for stat in ("bias_std", "bias_min", "bias_max")]
    ranks = [
        PanelSpec("busiest rank's load / mean rank load, every MoE layer",
                  regex=_every_layer("rank_load_max_over_mean")),
        PanelSpec("dropped fraction (capacity mode), every MoE layer", regex=_every_layer("dropped_frac")),
        PanelSpec("pipeline degree, every MoE layer", regex=_every_layer("pipeline_degree")),
    ]
    training = [
        PanelSpec("loss", keys=("loss", "val_loss")),
        PanelSpec("router losses", keys=("aux_loss",)),
        PanelSpec("learning rate", keys=("lr",)),
        PanelSpec("tokens per second", keys=("tokens_per_s",)),
    ]
    return [("Routing balance", balance), ("Expert load", load), ("Router bias", bias),
            ("Ranks and capacity", ranks), ("Training", training)]


def moe_layer_ids(model_cfg) -> list[int]:
    """Ids of the MoE layers of a model config (a ModelConfig or the `model` node of a run's config.yaml)."""
    from moetrain.model.transformer import is_moe_layer

    return [i for i in range(int(model_cfg.n_layers)) if is_moe_layer(model_cfg, i)]


def _layers_of_run(run_dir: Path) -> list[int]:
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise DashboardError(f"no config.yaml in {run_dir}: give the directory of a moetrain run (trainer.run_dir)")
    return moe_layer_ids(OmegaConf.load(path).model)


def _layers_of_overrides(overrides: Sequence[str]) -> list[int]:
    from moetrain.config.compose import compose_config
    from moetrain.config.validate import ConfigError

    try:
        return moe_layer_ids(compose_config(list(overrides)).model)
    except ConfigError as e:
        raise DashboardError(str(e)) from None


def _import_workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise DashboardError(WORKSPACES_MISSING) from e
    return ws, wr


def build_workspace(project: str, entity: str, moe_layers: Sequence[int], name: str = "moetrain routing"):
    """A `wandb_workspaces.workspaces.Workspace` holding `dashboard_sections(moe_layers)`; not saved."""
    ws, wr = _import_workspaces()

    def panel(spec: PanelSpec):
        if spec.kind == "media":
            return wr.MediaBrowser(title=spec.title, media_keys=list(spec.keys), gallery_axis="step")
        if spec.regex is not None:
            return wr.LinePlot(title=spec.title, x=X_AXIS, metric_regex=spec.regex)
        return wr.LinePlot(title=spec.title, x=X_AXIS, y=list(spec.keys))

    sections = [ws.Section(name=title, panels=[panel(p) for p in panels], is_open=True,
                           panel_settings=ws.SectionPanelSettings(x_axis=X_AXIS))
                for title, panels in dashboard_sections(moe_layers)]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=X_AXIS))


def workspace_definition(workspace) -> dict:
    """The view `workspace.save()` uploads, as plain JSON values."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Create a routing-balance workspace in a wandb project.")
    p.add_argument("--project", required=True, help="wandb project (logger.wandb_project of the runs)")
    p.add_argument("--entity", default=None, help="wandb entity (user or team); default: the API key's default")
    p.add_argument("--name", default="moetrain routing", help="the workspace's name")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="a moetrain run directory; its config.yaml gives the MoE layers (instead of OVERRIDEs)")
    p.add_argument("--offline-out", type=Path, default=None,
                   help="write the workspace definition (JSON) to this file instead of saving it to wandb")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                   help="training config overrides (model=small ...) that give the MoE layers")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not args.project.strip():
            raise DashboardError("--project must be a non-empty wandb project name")
        if args.run_dir is not None and args.overrides:
            raise DashboardError("give either --run-dir or training config overrides, not both")
        _import_workspaces()  # a missing package fails before anything else
        layers = _layers_of_run(args.run_dir) if args.run_dir is not None else _layers_of_overrides(args.overrides)
        if args.offline_out is not None:
            workspace = build_workspace(args.project, args.entity or "", layers, args.name)
            args.offline_out.parent.mkdir(parents=True, exist_ok=True)
            args.offline_out.write_text(json.dumps(workspace_definition(workspace), indent=1) + "\n")
            print(f"wrote the workspace definition ({len(layers)} MoE layers: {layers}) to {args.offline_out}")
            return 0
        workspace = build_workspace(args.project, args.entity or _default_entity(), layers, args.name)
        _save(workspace)
    except (DashboardError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(workspace.url)
    return 0


def _save(workspace) -> None:
    try:
        workspace.save()
    except Exception as e:  # network, authentication, permissions: surfaced by wandb as several types
        raise DashboardError(f"could not save the workspace to {workspace.entity}/{workspace.project} "
                             f"({type(e).__name__}: {e}); check `wandb login`, --entity and --project") from None


def _default_entity() -> str:
    import wandb

    try:
        entity = wandb.Api().default_entity
    except Exception as e:  # no API key, no network: wandb raises several types
        raise DashboardError(f"cannot reach wandb to find your entity ({type(e).__name__}: {e}); run `wandb login` "
                             f"or pass --entity, or use --offline-out FILE") from None
    if not entity:
        raise DashboardError("wandb has no default entity for this API key; pass --entity")
    return entity


if __name__ == "__main__":
    sys.exit(main())
