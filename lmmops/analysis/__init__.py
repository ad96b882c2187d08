"""Analysis of a fit: inference (standard errors, confidence intervals), outlier
statistics, prediction, model comparison, plots and the one-way model's estimators.
"""
