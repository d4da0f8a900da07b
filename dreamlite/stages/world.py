"""Stage kinds of the foundation: ``world`` (write a benchmark set, optionally with ground-truth images) and
``judge`` (score the images an earlier stage wrote). A stage that writes a benchmark leaves ``bench.json`` naming
its files, so any later judge can find them whatever produced them."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dreamlite.io import DreamliteError, inside, read_json, write_json, write_jsonl
from dreamlite.recipe import StageConfig, StageContext, stage
from dreamlite.evaluation.geneval import judge_gen, write_gen_bench
from dreamlite.evaluation.imgedit import judge_edit, write_edit_bench
from dreamlite.evaluation.shapes.perturb import Perturbation


class PerturbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    noise: float = Field(0.0, ge=0, description="Gaussian noise sigma, 1/255 units")
    blur: float = Field(0.0, ge=0, description="Gaussian blur sigma, px")
    jpeg: int = Field(0, ge=0, le=100, description="JPEG quality, 0 = none")
    shift: float = Field(0.0, ge=0, description="objects moved by up to this many px")


class WorldStage(StageConfig):
    kind: Literal["world"]
    bench: Literal["gen", "edit"]
    n: int = Field(20, ge=1, description="prompts per GenEval tag, or edits per ImgEdit type")
    images_per_prompt: int = Field(4, ge=1)
    size: int = Field(64, ge=32, le=256)
    render: bool = Field(True, description="also draw ground-truth images")
    perturb: PerturbConfig = PerturbConfig()


class JudgeStage(StageConfig):
    kind: Literal["judge"]
    input: str = Field(description="name of the earlier stage whose images are judged")

    def inputs(self) -> list[str]:
        return [self.input]


@stage(WorldStage)
def run_world(cfg: WorldStage, ctx: StageContext) -> dict:
    perturb = Perturbation(**cfg.perturb.model_dump())
    if cfg.bench == "gen":
        n = write_gen_bench(ctx.dir / "geneval", cfg.n, ctx.seed, cfg.render, cfg.images_per_prompt, cfg.size,
                            perturb, ctx.track)
        write_json(ctx.dir / "bench.json", {"bench": "gen", "folder": "geneval"})
        return {"prompts": n, "images": n * cfg.images_per_prompt if cfg.render else 0}
    n = write_edit_bench(ctx.dir / "imgedit", cfg.n, ctx.seed, cfg.render, cfg.size, perturb, ctx.track)
    write_json(ctx.dir / "bench.json", {"bench": "edit", "edits": "imgedit/edits.jsonl", "images": "imgedit/targets"})
    return {"edits": n, "images": n if cfg.render else 0}


@stage(JudgeStage)
def run_judge(cfg: JudgeStage, ctx: StageContext) -> dict:
    src = ctx.input(cfg.input)
    bench = read_json(src / "bench.json")
    if not isinstance(bench, dict) or bench.get("bench") not in ("gen", "edit"):
        raise DreamliteError(f"{src / 'bench.json'}: not a benchmark description")
    where = str(src / "bench.json")
    if bench["bench"] == "gen":
        results, summary = judge_gen(inside(src, bench.get("folder"), where), ctx.track)
    else:
        results, summary = judge_edit(inside(src, bench.get("edits"), where), inside(src, bench.get("images"), where),
                                      ctx.track)
    write_jsonl(ctx.dir / "results.jsonl", results)
    return {"bench": bench["bench"], **summary}
