"""The data-rich CPU quality study: its plan (which runs), its runner (resumable, two
runs side by side, raw results committed as JSON) and its report (tables and plots
regenerated from those JSON files alone)."""
