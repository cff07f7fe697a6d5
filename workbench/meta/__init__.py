"""The explainable meta-learner: stored runs -> features -> predicted speedup and quality per candidate
-> a recommendation under a quality budget, with its reasons, a counterfactual and the baseline as fallback.

Modules: ``features`` (the schema), ``learner`` (estimator, budget, recommendation, baselines),
``evaluate`` (leave-one-group-out table), ``explain`` (importances, partial dependence, attributions,
counterfactuals, plotly figures), ``persist`` (save/load without pickle).
"""
