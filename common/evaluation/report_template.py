"""The report.html page as a Jinja2 template (kept in a module, so it travels in the
Flower app bundle with the code that renders it). Self-contained: styles inline, figures as
data URIs, no scripts. ``report.render_html`` builds the context."""

TEMPLATE = r"""<!DOCTYPE html>
{%- macro table(t) -%}
<table><thead><tr>{% for h in t.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{%- for row in t.rows %}<tr{% if row.cls %} class="{{ row.cls }}"{% endif %}>
{%- for cell in row.cells %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor -%}
</tbody></table>
{%- endmacro -%}
<html lang="en"><head><meta charset="utf-8"><title>fedcxr report</title>
<style>{{ css }}</style></head><body>
<h1>fedcxr: external validation report</h1>
<p class="verdict {{ verdict_class }}">{{ verdict.overall }}</p>
{% if reference %}<p>{{ reference }}</p>{% endif %}
{{ forest_figure }}
{% if arm_drops %}<p><b>Internal vs external, per arm</b> (primary macro-AUC):</p>
{{ table(arm_drops) }}{% endif %}
<p><b>Rule (prespecified):</b> {{ verdict.rule }}</p>
{% if protocol %}<p><b>Protocol:</b> {{ protocol }}</p>{% endif %}
{% if by_image %}<p>No patient ids at {{ by_image | join(", ") }}: CIs and tests there are
clustered by image (images assumed independent).</p>{% endif %}
{% if primary %}<h2>Primary endpoint</h2>
{{ table(primary) }}{% endif %}
<h2>Secondary: per label</h2>
<p>Its own multiplicity family; it does not decide the verdict.</p>
<ul>{% for s in secondary %}<li>{{ s }}</li>{% endfor %}</ul>
<h2>Cohort</h2>
{{ table(cohort) }}
<h2>Training</h2>
{{ training_figure }}
{% if arms %}{{ table(arms) }}{% endif %}
<h2>External AUC (95% CI, clustered by patient)</h2>
<p>* adjusted p &lt; {{ alpha }} against the first model (secondary family); thresholds were
fixed on training-site validation data.</p>
{% for site in sites %}<h3>{{ site.name }}</h3>
{{ table(site.aucs) }}
{{ site.roc_figure }}
{% if site.calibration_model %}<h4>Calibration of {{ site.calibration_model }}</h4>
{{ site.calibration_figure }}{% endif %}
{% endfor %}
{% if drops %}<h2>Internal vs external</h2>
<p>Mean AUC on the training sites' own test splits, then at the held-out sites (and the
change), per model.</p>
{{ table(drops) }}{% endif %}
<h2>Paired tests (clustered DeLong)</h2>
{{ table(comparisons) }}
<h2>Subgroups</h2>
<p>Rows in red: AUC more than 0.05 below the best subgroup of the same attribute.</p>
{{ table(subgroups) }}
{% if readers %}<h2>Reference standard and readers (H2)</h2>
{% for s in readers.sentences %}<p>{{ s }}</p>{% endfor %}
{% if readers.effect %}<h3>Does the reference standard change the answer?</h3>
<p>The primary endpoint judged against the reference standard and against the site's own
labels, side by side (95% CIs clustered by patient).</p>
{{ table(readers.effect) }}{% endif %}
{% if readers.agreement %}<h3>How much the readers agree</h3>
<p>Fleiss' κ over the images read by the usual number of readers, with a 95% CI from a
bootstrap over patients; Cohen's κ for each pair of readers on the images both read
(0: chance agreement, 1: perfect).</p>
{{ table(readers.agreement) }}{% endif %}
{% if readers.readers %}<h3>Each reader against the others</h3>
<p>A reader's calls against the majority of the other readers (never a reference they
voted in). The readers are the triangles on the ROC curves above.</p>
{{ table(readers.readers) }}{% endif %}
{% if readers.model_vs_readers %}<h3>The model against the readers</h3>
<p>Each model at the readers' mean operating point, against the reference standard. The
CIs come from a bootstrap that resamples patients and readers together, so they carry
both case and reader variability.</p>
{{ table(readers.model_vs_readers) }}{% endif %}
{% endif %}
{% if localisation %}<h2>Where the models look (H3)</h2>
{% for s in localisation.sentences %}<p>{{ s }}</p>{% endfor %}
{% if localisation.localisation %}{{ table(localisation.localisation) }}{% endif %}
{% if localisation.shortcut %}<h3>Shortcut reliance</h3>
{{ table(localisation.shortcut) }}{% endif %}
{% endif %}
<h2>Simulated device shift</h2>
{{ shift_figure }}
<h2>Privacy</h2>
{{ privacy_figure }}
{% if privacy %}{{ table(privacy) }}{% endif %}
{% if client_dp %}<p>{{ client_dp }}</p>{% endif %}
{% if releases %}<h3>What each site released</h3>
<p>Every statistic a site sent, and whether differential privacy covers it (ε: that
mechanism's own ε at the site's δ; the site's total is in the table above). Statistics not
covered are sent exactly, under the small-cell rule in the note.</p>
{{ table(releases) }}{% endif %}
<h2>Provenance</h2>
<pre>{{ provenance }}</pre>
</body></html>
"""

REPLICATES_TEMPLATE = r"""<!DOCTYPE html>
{%- macro table(t) -%}
<table><thead><tr>{% for h in t.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{%- for row in t.rows %}<tr>{% for cell in row.cells %}<td>{{ cell }}</td>{% endfor %}</tr>
{%- endfor -%}
</tbody></table>
{%- endmacro -%}
<html lang="en"><head><meta charset="utf-8"><title>fedcxr replicates</title>
<style>{{ css }}</style></head><body>
<h1>fedcxr: replicates</h1>
<p class="verdict">{{ sentence }}</p>
<p>The same experiment trained again under each seed (model initialisation and training
order). The t-interval across replicates measures training variance; the within-run CI
(each run's report) measures held-out data variance.</p>
<h2>Verdict per replicate</h2>
{{ table(runs) }}
<h2>Primary differences across replicates</h2>
{{ table(comparisons) }}
</body></html>
"""
