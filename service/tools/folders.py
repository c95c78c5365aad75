"""Scoring folders of generated images, split by concern: layouts (folder_layouts), the resumable writer
(folder_results), the local engine (folder_engine), the Ray engine (folder_ray) and summaries (folder_summary).
This module is their one import surface."""

from __future__ import annotations

from .folder_engine import Backend, ClientBackend, RunStats, ScorerBackend, decode_or_path, score_items
from .folder_layouts import (
    LAYOUTS,
    FolderItem,
    detect_layout,
    flat_items,
    folder_items,
    geneval_items,
    read_prompts_file,
    t2i_compbench_items,
)
from .folder_ray import score_items_ray
from .folder_results import RESULTS_FILE, ResultsWriter, read_rows, write_parquet
from .folder_summary import format_summary, summarise, versions_of, write_run_config

__all__ = [
    "LAYOUTS",
    "RESULTS_FILE",
    "Backend",
    "ClientBackend",
    "FolderItem",
    "ResultsWriter",
    "RunStats",
    "ScorerBackend",
    "decode_or_path",
    "detect_layout",
    "flat_items",
    "folder_items",
    "format_summary",
    "geneval_items",
    "read_prompts_file",
    "read_rows",
    "score_items",
    "score_items_ray",
    "summarise",
    "t2i_compbench_items",
    "versions_of",
    "write_parquet",
    "write_run_config",
]
