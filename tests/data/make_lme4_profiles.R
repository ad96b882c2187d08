#!/usr/bin/env Rscript
## lme4 profile-likelihood intervals for random-slope models (confint.merMod, method =
## "profile", oldNames = FALSE, level 0.95).
##
## Provenance only: tests and CI never run R. They read lme4_profiles.json, which this
## script writes next to itself:
##
##     Rscript tests/data/make_lme4_profiles.R
##
## Each fit uses lme4's default lmerControl(); the intervals are lme4's spline
## interpolation of the profile (profile.merMod defaults), so they carry lme4's own
## interpolation error, of the order 1e-4 relative.
##
## lme4 1.1-31 profiles the ML deviance also for a REML fit: the REML and ML entries of
## sleepstudy agree to 1e-5 (the REML one is kept to show it). lmmops profiles the fit's
## own criterion, so its tests compare with the ML entries.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})
file_arg <- grep("^--file=", commandArgs(FALSE), value = TRUE)
here <- if (length(file_arg)) dirname(normalizePath(sub("^--file=", "", file_arg[1]))) else "."

data(Orthodont, package = "nlme")
models <- list(
  list(id = "sleepstudy-corr-REML", data = "lme4::sleepstudy",
       formula = "Reaction ~ Days + (Days | Subject)", REML = TRUE, d = sleepstudy),
  list(id = "sleepstudy-corr-ML", data = "lme4::sleepstudy",
       formula = "Reaction ~ Days + (Days | Subject)", REML = FALSE, d = sleepstudy),
  list(id = "sleepstudy-uncorr-ML", data = "lme4::sleepstudy",
       formula = "Reaction ~ Days + (Days || Subject)", REML = FALSE, d = sleepstudy),
  list(id = "orthodont-corr-ML", data = "nlme::Orthodont",
       formula = "distance ~ age + (age | Subject)", REML = FALSE,
       d = as.data.frame(Orthodont))
)
fits <- lapply(models, function(m) {
  fit <- lmer(as.formula(m$formula), data = m$d, REML = m$REML)
  ci <- suppressWarnings(confint(fit, method = "profile", oldNames = FALSE, level = 0.95))
  list(id = m$id, data = m$data, formula = m$formula,
       method = if (m$REML) "REML" else "ML",
       criterion = as.numeric(-2 * logLik(fit)),
       parameter = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2]))
})
out <- list(
  about = paste("lme4 profile intervals (confint(m, method = 'profile', oldNames = FALSE),",
                "level 0.95) for random-slope models; written by",
                "tests/data/make_lme4_profiles.R (provenance only)."),
  versions = list(R = R.version.string, lme4 = as.character(packageVersion("lme4"))),
  date = format(Sys.time(), "%Y-%m-%d %H:%M:%S UTC", tz = "UTC"),
  fits = fits)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(here, "lme4_profiles.json"))
