"""The compression step: the JD kernel, clusters, the plan over modules, bundles, exports, reports, checks."""
