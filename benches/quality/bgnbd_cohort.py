"""A purchase cohort with known truth: customers drawn from BG/NBD + Gamma-Gamma with fixed
parameters, so each customer's true expected hold-out spend is computable from their latent
rate, dropout probability and spend scale.

    python bgnbd_cohort.py generate OUT.ndjson TRUTH.csv   # purchases (segstream's NDJSON) + truth
    python bgnbd_cohort.py score TRUTH.csv USERS.ndjson HORIZON_DAYS

`generate` writes one purchase event per transaction over CAL_DAYS + HOLD_DAYS; the truth file
holds each customer's calibration transactions summary and true expected hold-out spend.
`score` fits BG/NBD + Gamma-Gamma (lifetimes) on the calibration period — the model that
generated the data, so its fit is the ceiling — and prints Pearson r with the truth and
calibration (Σ predicted ÷ Σ true expected spend) for it and for segstream's predictions as
of the cut-off (its horizon-day value scaled to the hold-out).
"""

import contextlib
import io
import json
import sys

import numpy as np
import pandas as pd
from lifetimes import BetaGeoFitter, GammaGammaFitter
from scipy.stats import pearsonr, spearmanr

# BG/NBD: purchase rate lambda ~ Gamma(r, alpha) per day; dropout after each purchase p ~ Beta(a, b).
R, ALPHA, A, B = 0.6, 12.0, 1.0, 6.0
# Gamma-Gamma: a transaction's spend ~ Gamma(P, nu), nu ~ Gamma(Q, GAMMA): mean spend P / nu.
P, Q, GAMMA = 4.0, 3.0, 60.0
CUSTOMERS = 6000
CAL_DAYS, HOLD_DAYS = 365, 90
START_MS = 1_293_840_000_000  # 2011-01-01
DAY_MS = 86_400_000
SEED = 7


def generate(out_path, truth_path):
    rng = np.random.default_rng(SEED)
    rows, events = [], []
    for c in range(CUSTOMERS):
        lam = rng.gamma(R, 1.0 / ALPHA)
        p = rng.beta(A, B)
        nu = rng.gamma(Q, 1.0 / GAMMA)
        # Customers are acquired over the first half of the calibration period, with a purchase.
        t = rng.uniform(0.0, CAL_DAYS / 2)
        alive, times = True, [t]
        # Repeat purchases at rate lam; after each, the customer drops out with probability p.
        while alive:
            t += rng.exponential(1.0 / lam)
            if t > CAL_DAYS + HOLD_DAYS:
                break
            times.append(t)
            alive = rng.random() >= p
        # Alive at the cut-off unless the purchase they dropped out after came before it; then
        # E[purchases in the hold-out] = integral of lam e^{-lam p s} = (1 - e^{-lam p tau}) / p.
        alive_at_cut = alive or times[-1] > CAL_DAYS
        expected = (1.0 - np.exp(-lam * p * HOLD_DAYS)) / p if alive_at_cut else 0.0
        mean_spend = P / nu
        cal = [x for x in times if x <= CAL_DAYS]
        rows.append((f"c{c}", cal[0], len(cal), expected * mean_spend))
        for i, x in enumerate(times):
            amount = round(float(rng.gamma(P, 1.0 / nu)), 2)
            events.append((x, c, i, amount))
    events.sort()
    with open(out_path, "w") as f:
        for x, c, i, amount in events:
            e = {
                "event_id": f"c{c}-{i}",
                "user_id": f"c{c}",
                "event_time": START_MS + int(x * DAY_MS),
                "order_id": f"c{c}-{i}",
                "status": "placed",
                "items": [{"product_id": "p", "category": "goods", "quantity": 1,
                           "unit_price": amount}],
                "total": amount,
                "currency": "GBP",
            }
            f.write(json.dumps(e) + "\n")
    pd.DataFrame(rows, columns=["user_id", "first_day", "cal_purchases", "true_holdout_spend"]) \
        .to_csv(truth_path, index=False)
    print(f"cut-off: {pd.Timestamp(START_MS + CAL_DAYS * DAY_MS, unit='ms').isoformat()}Z")


def score(truth_path, users_path, horizon_days, purchases_path):
    truth = pd.read_csv(truth_path).set_index("user_id")["true_holdout_spend"]
    ev = pd.read_json(purchases_path, lines=True, convert_dates=False)
    ev["day"] = (ev["event_time"] - START_MS) / DAY_MS
    cal = ev[ev["day"] <= CAL_DAYS]
    hold = ev[ev["day"] > CAL_DAYS]
    actual = hold.groupby("user_id")["total"].sum().reindex(truth.index, fill_value=0.0)
    # lifetimes' summary: repeat purchases (distinct days), recency and age in days.
    g = cal.assign(d=cal["day"].astype(int)).groupby(["user_id", "d"])["total"].sum().reset_index()
    first = g.groupby("user_id")["d"].min()
    last = g.groupby("user_id")["d"].max()
    summary = pd.DataFrame({
        "frequency": g.groupby("user_id").size() - 1,
        "recency": last - first,
        "T": CAL_DAYS - first,
        "monetary_value": g[g.groupby("user_id")["d"].transform("min") != g["d"]]
        .groupby("user_id")["total"].mean(),
    }).reindex(truth.index).fillna({"monetary_value": 0.0})
    with contextlib.redirect_stdout(io.StringIO()):
        bgf = BetaGeoFitter(penalizer_coef=0.0).fit(
            summary["frequency"], summary["recency"], summary["T"])
    repeat = summary[(summary["frequency"] > 0) & (summary["monetary_value"] > 0)]
    ggf = GammaGammaFitter(penalizer_coef=0.0).fit(repeat["frequency"], repeat["monetary_value"])
    purchases = bgf.conditional_expected_number_of_purchases_up_to_time(
        HOLD_DAYS, summary["frequency"], summary["recency"], summary["T"])
    spend = ggf.conditional_expected_average_profit(summary["frequency"], summary["monetary_value"])
    fitted = (purchases * spend).fillna(0.0)
    users = {}
    for line in open(users_path):
        u = json.loads(line)
        users[u["user_id"]] = u["predicted_value"]
    ours = pd.Series([users.get(c, 0.0) for c in truth.index], index=truth.index)
    ours = ours * HOLD_DAYS / horizon_days

    def row(name, pred):
        r_truth = pearsonr(pred.values, truth.values)[0]
        r_actual = pearsonr(pred.values, actual.values)[0]
        rho = spearmanr(pred.values, truth.values).correlation
        return (f"| {name} | {r_truth:.3f} | {rho:.3f} | {r_actual:.3f} | "
                f"{pred.sum() / truth.sum():.2f} |")

    print(f"- customers: {len(truth)}; BG/NBD r={R}, alpha={ALPHA}, a={A}, b={B}; Gamma-Gamma "
          f"p={P}, q={Q}, gamma={GAMMA}; {CAL_DAYS} days of calibration, {HOLD_DAYS} held out")
    print(f"- true expected hold-out spend {truth.sum():,.0f}; realised {actual.sum():,.0f}; "
          f"fitted BG/NBD: r={bgf.params_['r']:.2f}, alpha={bgf.params_['alpha']:.1f}, "
          f"a={bgf.params_['a']:.2f}, b={bgf.params_['b']:.2f}\n")
    print("| predictor | Pearson r with the truth | Spearman ρ with the truth | Pearson r with "
          "realised spend | calibration (Σ predicted ÷ Σ true) |\n| --- | --- | --- | --- | --- |")
    print(row("the truth itself", truth))
    print(row("BG/NBD + Gamma-Gamma fitted on the calibration period (the ceiling)", fitted))
    print(row(f"segstream online ({horizon_days:.0f}-day value × {HOLD_DAYS}/{horizon_days:.0f})",
              ours))
    r_ours = pearsonr(ours.values, truth.values)[0]
    r_fit = pearsonr(fitted.values, truth.values)[0]
    print(f"\nsegstream's Pearson with the truth is {r_ours / r_fit:.2f} × the ceiling's.")


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        generate(sys.argv[2], sys.argv[3])
    else:
        score(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
