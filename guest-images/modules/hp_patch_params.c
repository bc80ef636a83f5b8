// SPDX-License-Identifier: GPL-2.0
/*
 * hyperpatch test livepatch: module parameters of every type hyperpatch
 * sets (int, uint, long, bool, charp, string), shown by the patched
 * cmdline_proc_show(); and `mode` for inits that go wrong:
 *   mode=0  enable the patch (default)
 *   mode=1  fail with -ENODEV
 *   mode=2  return 0 without calling klp_enable_patch()
 *   mode=3  call klp_enable_patch() twice
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int mode;
module_param(mode, int, 0444);
static int ival = -1;
module_param(ival, int, 0444);
static unsigned int uval = 1;
module_param(uval, uint, 0444);
static long lval = -2;
module_param(lval, long, 0444);
static bool bval;
module_param(bval, bool, 0444);
static char *cval = "none";
module_param(cval, charp, 0444);
static char sval[8] = "empty";
module_param_string(sval, sval, sizeof(sval), 0444);

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "hp_patch_params i=%d u=%u l=%ld b=%d c=%s s=%s\n", ival, uval, lval, bval, cval, sval);
	return 0;
}

static struct klp_func funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = livepatch_cmdline_proc_show, },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = funcs, },
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int livepatch_init(void)
{
	int ret;

	pr_info("hp_patch_params: init mode=%d\n", mode);
	switch (mode) {
	case 1:
		return -ENODEV;
	case 2:
		return 0;
	case 3:
		ret = klp_enable_patch(&patch);
		if (ret)
			return ret;
		ret = klp_enable_patch(&patch);
		pr_info("hp_patch_params: second klp_enable_patch() returned %d\n", ret);
		return 0;
	default:
		return klp_enable_patch(&patch);
	}
}

static void livepatch_exit(void)
{
	pr_info("hp_patch_params: exit\n");
}

module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
