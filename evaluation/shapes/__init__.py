"""The shapes world: spec, renderer, seeded samplers, and the GenEval / ImgEdit-style judge."""
from .clauses import MetadataError, evaluate, relations, validate_metadata
from .perception import ImageError, Parsed, Seen, artifact_measures, parse
from .render import render
from .spec import BACKGROUNDS, COLORS, SHAPES, STYLES, Obj, Scene, SceneError
from .world import EDIT_TYPES, GEN_TAGS, EditRecord, GenPrompt, sample_edit, sample_gen_prompt, sample_t2i, scene_for

__all__ = ["BACKGROUNDS", "COLORS", "SHAPES", "STYLES", "Obj", "Scene", "SceneError", "render", "parse", "Parsed",
           "Seen", "artifact_measures", "ImageError", "evaluate", "relations", "validate_metadata", "MetadataError",
           "GEN_TAGS", "EDIT_TYPES", "GenPrompt", "EditRecord", "sample_gen_prompt", "scene_for", "sample_t2i",
           "sample_edit"]
