"""Evaluation: the shapes world and its judge, GenEval / ImgEdit-format benchmark folders."""
