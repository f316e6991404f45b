"""Step profiler: phases of each step, throughput, MFU, memory, clocks, verdict and reports."""
from thruput.profile.clocks import ClockSampler, ClockSource, CpuFreqSource, NvmlSource
from thruput.profile.collectives import collective
from thruput.profile.html import render_comparison_html, render_html, save_comparison_html, save_html
from thruput.profile.job import load_job, merge_job
from thruput.profile.job_report import render_job_terminal, save_job_html
from thruput.profile.peaks import lookup_peak, measure_cpu_peak
from thruput.profile.report import load_json, render_terminal, run_document, save_json
from thruput.profile.steps import PHASES, StepProfiler, StepRecord
from thruput.profile.trace import chrome_trace, job_trace, save_job_trace, save_trace
from thruput.profile.verdict import Finding, Verdict, verdict

# What users call. Internals (clock sources, verdict findings, the demo's comparison page)
# stay importable from their modules: thruput.profile.clocks, .verdict, .html.
__all__ = [
    "PHASES", "ClockSampler", "StepProfiler", "StepRecord", "Verdict", "chrome_trace", "load_json", "lookup_peak",
    "measure_cpu_peak", "render_html", "render_terminal", "run_document", "save_html", "save_json", "save_trace",
    "verdict",
    "collective", "job_trace", "load_job", "merge_job", "render_job_terminal", "save_job_html", "save_job_trace",
]
